"""``batch_mode="factored"``: the passes for a chunk of examples at once (:mod:`.passes`), each
example's update added from factors by a rule per module type (:mod:`.rules`), on the models the
traced graph admits (:mod:`.tracing`).
"""
