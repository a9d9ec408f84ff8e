select 1$a$canary$a$, $1$tag$canary$tag$, 1.5$$x$$, a$b$c$b$, $abc, 1e'\' , canary --'
