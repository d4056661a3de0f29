"""The model and where interventions enter: config, modules, the T5 model, sites, taps, dropout."""
