from job.cli.main import main

main()
