"""params.yaml: reading it, the one merge of its layers (variants, presets, overrides), the configs its
sections become (validated by pydantic), the schema of the whole file, the study's runs, presets.
Free of torch: `medkd check-params` imports none.
"""
