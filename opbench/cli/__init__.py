"""The command line: one module per verb, the shared selection and output in common/output."""
