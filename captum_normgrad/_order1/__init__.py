"""The engine behind :class:`~captum_normgrad.LayerNormGradOrder1`: the per-example passes of order 1.

- :mod:`.plan`: which batch mode runs a call, and how many examples go in a chunk;
- :mod:`.examples`: per-example slices of the inputs and targets, and the parts joined back;
- :mod:`.autograd`: the forward caller, gradients and second derivatives every mode shares;
- :mod:`.loop`, :mod:`.vmap`, :mod:`.factored`: the three ways to run the passes.
"""
