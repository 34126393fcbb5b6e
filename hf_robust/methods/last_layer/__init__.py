"""Last-layer retraining on a held-out part of the data, shared by GradTune, DFR and FairDropout-DFR, with no
method's rule in it: its arguments (`config`), the held-out split and cached scores (`scores`), the shared head
training (`linear_head`), the stages as a component of a trainer with a per-method `LastLayerRule`
(`retraining`), and the ERM-then-last-layer trainer GradTune and DFR subclass (`trainer`). The methods' rules are
in `hf_robust.methods.gradtune.rule` and `hf_robust.methods.dfr.rule`."""
