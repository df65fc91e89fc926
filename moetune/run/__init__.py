"""One recipe's run directory: the `Run` its stages share and the model with its adapter (`session`),
and the guard that never loses or doubles a run (`rundir`)."""
