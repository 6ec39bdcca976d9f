"""The built-in explanation methods, one module each; every module here is imported when
:data:`steerlex.explain.method.EXPLANATION_METHODS` is first read."""
