"""The benchmarks behind `scripts/benchmark.py`: one module per method (`masktune`, `gradtune` (GradTune and DFR),
`fair_dropout`, `counterfactual`), the shortcut suite (`suite`), real MNIST (`mnist`, also a script of its own),
and what they share (`common`). Results go to `scripts/benchmark_results.json`."""
