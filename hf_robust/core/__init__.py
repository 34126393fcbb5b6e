"""The method-agnostic core: the training-arguments base (`config`), the trainer (`trainer`: checks, batches, loss,
group evaluation, saving) and its mixins — the stage engine (`stages`), the model state and stage outputs on disk
(`checkpoints`), the health check and label-free selection (`selection`, over the pure verdicts of `health`), the
per-example pass over processes (`per_example`), the report, card and Hub push (`report`) — and their helpers:
group metrics (`evaluation`), the balanced sampler (`sampling`), atomic files (`files`), the output folder's lock
and staging (`run_folder`) and BatchNorm statistics over processes (`sync_norm`).

The core names no method: a method adds stages, knobs and hooks in its own package (`hf_robust.methods`).
"""
