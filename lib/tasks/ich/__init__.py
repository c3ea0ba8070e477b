"""RSNA Intracranial Hemorrhage Detection 2019."""
