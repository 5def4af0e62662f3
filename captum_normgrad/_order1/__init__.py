"""The engine behind :class:`~captum_normgrad.LayerNormGradOrder1`: the per-example passes of order 1.

- :mod:`.engine`: the one driver, over the :class:`~.engine.Passes` every mode implements;
- :mod:`.plan`: which batch mode runs a call, and how many examples go in a chunk (a frozen plan);
- :mod:`.settings`: the frozen settings every pass reads;
- :mod:`.examples`: per-example slices of the inputs, arguments and targets;
- :mod:`.autograd`: the forward caller, gradients and second derivatives every mode shares;
- :mod:`.loop`, :mod:`.vmap`, :mod:`.factored`: the three ways to run the passes.
"""
