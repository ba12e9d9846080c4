"""Policy optimisation: the arithmetic (`algos`, torch only), the config sections (`sections`), the model
set (`models`), rollouts and their engines (`rollout`), and what the stages share around a step (`stage`).
Nothing is imported here, so that `pipeline.rl.algos` loads without DeepSpeed or TRL."""
