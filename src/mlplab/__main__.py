from mlplab.main import main

main()
