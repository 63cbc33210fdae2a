from expvl.configs.slurm import main

main()
