"""Built-in demo agents and problems: the quickstart runs with no API keys.

The problems are small engineering design problems (:mod:`workers.demo.problems`); the agents
are search strategies whose budget, step size and temperature come from the condition's
factor levels (:mod:`workers.demo.agents`). All of them are stochastic, so the run seed
matters, and each run takes a few milliseconds. ``noop``, ``sleep`` and ``flaky`` exist for
benchmarks and failure tests. They are registered as ``studyq.agents`` / ``studyq.problems``
entry points, and use only parameter names the upstream runner also passes, so the same
functions run under design-research-experiments too.
"""
