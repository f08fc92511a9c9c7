"""SetFit as a learner, so the suite runs it on the same supports as everything else (optional: the `peers`
extra). Each `adapt` trains a fresh SetFit model from the encoder's pretrained weights; nothing is shared
between tasks."""

from __future__ import annotations

import tempfile

import numpy as np
import torch

from metanlp.config import DEFAULT_ENCODER, Provenance, SetFitConfig
from metanlp.data.load import DataError
from metanlp.encoder import TextEncoder, TokenizedTexts, default_encoder_path
from metanlp.learners.base import Classifier, Learner, support_targets


class SetFitPeer(Learner):
    def __init__(self, encoder: TextEncoder, config: SetFitConfig | None = None,
                 provenance: Provenance | None = None) -> None:
        super().__init__(encoder, config or SetFitConfig(), provenance)

    def adapt(self, support, labels) -> Classifier:
        try:
            from datasets import Dataset
            from setfit import SetFitModel, Trainer, TrainingArguments
        except ImportError as err:
            raise DataError('the setfit peer needs `pip install -e ".[peers]"`') from err
        classes, targets = support_targets(list(labels))
        texts = list(support.texts if isinstance(support, TokenizedTexts) else support)
        name = self.encoder.config.name_or_path
        model = SetFitModel.from_pretrained(default_encoder_path() if name == DEFAULT_ENCODER else name)
        seed = int(torch.randint(0, 2**31 - 1, ()).item())  # follows the seeded scope the caller runs it in
        with tempfile.TemporaryDirectory() as scratch:
            arguments = TrainingArguments(output_dir=scratch, batch_size=self.config.batch_size,
                                          num_iterations=self.config.num_iterations,
                                          num_epochs=self.config.num_epochs, seed=seed, report_to="none",
                                          save_strategy="no", show_progress_bar=False)
            dataset = Dataset.from_dict({"text": texts, "label": targets.tolist()})
            Trainer(model=model, args=arguments, train_dataset=dataset).train()

        def logits(queries: TokenizedTexts) -> torch.Tensor:
            probabilities = np.asarray(model.predict_proba(queries.texts, as_numpy=True), dtype=np.float64)
            return torch.log(torch.as_tensor(probabilities).clamp_min(1e-12))

        return Classifier(classes, self.encoder, logits)
