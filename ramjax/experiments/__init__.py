"""Experiment drivers built on the library: the RAM recipe end to end (``pipeline``), the generated task suite and
its judge (``tasks``), the α × aligner-size sweep (``ablate``), the realignment λ sweep (``realign_sweep``) and their
plots (``plots``). The library (``ramjax.*`` outside this package) never imports from here."""
