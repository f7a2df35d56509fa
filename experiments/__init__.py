"""Applications built on the mudsc_graph library (outside it, import name mudsc_experiments): tasks and
training, evaluation, the demo and its model cache."""
