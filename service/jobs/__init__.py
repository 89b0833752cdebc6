"""Fine-tuning jobs: validation and submission (`service.JobService`), the
runner that starts one worker process per job (`runner.JobRunner`), and the
worker itself (`python -m tlserve.service.jobs.worker`)."""
