"""Your project: the networks, the datamodules of its data, the tasks (loss, metrics, output),
its figures and experiments. Yours to edit; the `mlplab` platform never imports it."""
