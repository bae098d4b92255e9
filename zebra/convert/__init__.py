"""Teacher -> student conversion (SPEC 1 step 1, 3): teacher loading, layer layout, SVD init of MLA (3.1),
attention -> Mamba2 init (3.2), and the end-to-end `convert` that writes a loadable student directory.

Submodules are imported where used, so `import zebra.convert.layout` (used by `zebra kv`) never loads a model.
"""
