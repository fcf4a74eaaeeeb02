"""The Lambda Cloud launcher behind `uv run launch_lambda.py`. It runs on a laptop with only
requests and python-dotenv, so nothing here imports torch or the rest of nanochat.

errors    exit codes and LaunchError          settings  keys from the environment / .env
api       the Lambda Cloud API client         state     what this laptop launched
ssh       ssh subprocesses to one node        deploy    ship the tree, start and watch the run
fetch     bring results home                  cost      dollars and durations for messages
launch    the `launch` and `resume` commands  commands  types, status, logs, fetch, terminate, ssh
filesystem  the run on a persistent filesystem (create, region, base dir, lock of a gone instance)
nodes     `deploy --hosts`: the run on machines the user has, one node each
cli       flags and main()
"""
