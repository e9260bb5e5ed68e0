-- Runs once, when the postgres volume is first initialised: the MLflow tracking server
-- keeps its runs in a database of its own, owned by the same role as the workbench's.
CREATE DATABASE mlflow;
