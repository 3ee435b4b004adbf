"""mlplab's own commands beside LightningCLI's: sweep, search, baseline, export, predict from a
file, reproduce (each module has a `main(argv)`)."""
