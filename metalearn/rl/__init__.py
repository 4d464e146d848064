"""Reinforcement learners and what they share: the trial rollout (trial.py), PPO's maths
(ppo.py), the recurrent core (gru.py, a model option), RL² (rl2.py) and the bandit baselines
(baselines.py). The environments they run on are metalearn/envs/."""
