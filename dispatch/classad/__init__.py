"""HTCondor's ClassAd expression language, the subset ``Requirements`` is written in.

- :mod:`dispatch.classad.values`: the values, ``UNDEFINED`` and ``ERROR``, and operators;
- :mod:`dispatch.classad.functions`: the built-in functions, ``regexp()`` among them;
- :mod:`dispatch.classad.tree`: the nodes a parsed expression is made of;
- :mod:`dispatch.classad.parser`: the tokenizer and parser, with their size limits.

:mod:`dispatch.requirements` is the interface the rest of Dispatch uses.
"""
