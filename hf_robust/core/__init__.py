"""The method-agnostic core: the training-arguments base (`config`), the stage engine and report (`trainer`),
the health check and label-free selection score (`health`), atomic files (`files`), the output folder's lock
and staging (`run_folder`) and BatchNorm statistics over processes (`sync_norm`).

The core names no method: a method adds stages, knobs and hooks in its own package (`hf_robust.methods`).
"""
