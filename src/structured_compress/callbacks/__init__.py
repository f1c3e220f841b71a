"""Lightning callbacks: FLOP counting, pretrained init, Gaudi width shrinking and sigma annealing."""
