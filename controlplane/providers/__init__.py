"""Sources of VMs: each provider turns what it reads into PlanVM entries and
serves each disk over NBD for transferd."""
