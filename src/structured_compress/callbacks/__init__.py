"""Lightning callbacks: FLOP counting, pretrained init, Gaudi width shrinking and sigma annealing, the NaN/Inf guard
and the preemption checkpoint (SIGTERM / SIGUSR1)."""
