"""Run one experiment of `genir-jax reproduce` again on its output folder, through the library:

    python -m experiments table3 --run runs/squad-dev-tiny      # by id (see --list)
    python -m experiments table3_stage_patching --run DIR       # or by module name

The experiments themselves (configuration, steps, paper numbers, rendering) and their registry live in
`genir_jax.paper.experiments`; this package only chooses one and runs it, so a new experiment needs nothing here.
"""
