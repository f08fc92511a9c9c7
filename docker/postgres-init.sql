-- One server, one database per tool: MLflow (created by POSTGRES_DB), Prefect and Optuna.
CREATE DATABASE prefect;
CREATE DATABASE optuna;
