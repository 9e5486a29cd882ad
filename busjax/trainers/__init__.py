"""Trainers: one standalone ``train_and_evaluate(config, workdir)`` per regime."""
