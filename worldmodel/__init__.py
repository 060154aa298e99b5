"""World model: tokenizer, dynamics model, imagination (batched rollouts, dream envs), training loops."""
