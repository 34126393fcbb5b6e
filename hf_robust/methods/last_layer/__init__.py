"""Last-layer retraining on a held-out part of the data, shared by GradTune, DFR and FairDropout-DFR: its
arguments (`config`) and the stages it adds to a trainer (`mixin`)."""
