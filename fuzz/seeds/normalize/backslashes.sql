select 'a\' , canary --', N'\''', E'a'
'\' , x --'
, B'1''0', U&'\0061'
'b'
