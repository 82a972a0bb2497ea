"""Pure analyses over a run's tables: oracle, bootstrap, similarity, features, controllers."""
