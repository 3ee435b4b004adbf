from mlplab.cli import main

main()
