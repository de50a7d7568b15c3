from mig_core.cli import main

main()
