"""L3: the training-loop side — TrainState (every piece of a run's state), data position, provenance."""
