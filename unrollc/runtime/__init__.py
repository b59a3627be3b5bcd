"""Runtime: the Stepper that runs step graphs, the unroll state, and checkpoint schedules."""
