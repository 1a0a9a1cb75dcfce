"""What a run costs on a pod, before it runs: AOT compilation for TPU topologies, the fit report
against the analytic minimum, scaling sweeps and the golden parameter shardings."""
