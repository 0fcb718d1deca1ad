"""Adapters that put ``g4route.route`` inside other libraries' Gemma 4 MoE layers.

- ``g4route.adapters.vllm_plugin`` and ``g4route.adapters.sglang``: the engines' plugins (entry points
  ``vllm.general_plugins`` and ``sglang.srt.plugins``), which route the engines' own Gemma 4 models through
  g4route once g4route is installed; ``engines.py`` holds what they share and what ``g4route info`` reports.
- ``g4route.adapters.vllm``: ``make_vllm_routing_function(per_expert_scale)``, a ``custom_routing_function``
  for vLLM's ``FusedMoE`` in models built by hand (imports nothing from vLLM).
- ``g4route.adapters.transformers``: ``patch_gemma4(model)``, which makes a Hugging Face Gemma 4 MoE model
  route through g4route, with ``undo()`` (needs the ``transformers`` package).

No library is a dependency of g4route: each adapter imports only what it uses, when it is called, and the
plugins never import their engine (they patch its model module when the engine imports it).
"""
