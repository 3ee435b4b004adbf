"""Tracking: the MLflow logger of a run, the store it writes to, the journal that keeps writes
while a tracking server is away, logged models, system metrics, `mlplab runs` and `mlplab
server`."""
