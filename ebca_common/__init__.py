"""The contract shared by the api and the worker: settings, request models, job states, the Redis
job store, storage backends and the error hierarchy. Imports no torch."""
