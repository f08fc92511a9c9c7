"""Prefect entry point: `python flows/train_flow.py [params.yaml]` runs the pipeline once (ephemeral
Prefect unless PREFECT_API_URL points at a server); deployments use `flows/train_flow.py:train_flow`."""

import sys
from pathlib import Path

from metanlp.pipeline import build_flow
from metanlp.runtime import apply_environment_defaults

# Prefect finds a deployment's flow as a module-level object, so this entry file builds it on import
# (the package builds it only when asked: `metanlp.pipeline.build_flow`).
ROOT = Path(__file__).resolve().parents[1]
apply_environment_defaults(ROOT)
train_flow = build_flow()

if __name__ == "__main__":
    train_flow(params_file=sys.argv[1] if len(sys.argv) > 1 else "params.yaml", root=str(ROOT))
