//! Training: optimiser, LR schedule, EMA, checkpoints, evaluation, MLPerf logging, the trainer loop.
