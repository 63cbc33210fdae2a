from configs.slurm import main

main()
