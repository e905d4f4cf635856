"""Generated code for sc2deploy/v1/completion.proto (see sc2deploy/serving/codegen.py); do not edit."""
