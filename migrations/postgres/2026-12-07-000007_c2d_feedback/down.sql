DROP TABLE c2d_feedback;
