select * from t where a = 'x' and b = $$y$$ and c = E'z\'' -- c
