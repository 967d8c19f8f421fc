"""The ways a release hands out stock besides first come, first served: the waiting room
(queue), the standby list and the lottery."""
