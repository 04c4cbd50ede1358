"""The scenario suite: YAML load tests run by the mesh itself (docs/scenarios.md).

``model`` holds the validated types, ``format`` turns YAML into them, ``runner`` executes runs on
the leader, ``http`` serves ``/api/tests``. The YAML files next to them are the shipped scenarios.
"""
